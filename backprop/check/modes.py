"""Entry by entry, or along a few directions: which ``gradcheck`` runs, and the directions.

``mode="entries"`` compares every entry of every Jacobian: the batch Jacobian
of each input and parameter is made dense and differenced one entry at a
time, which costs ``|z|`` pairs of forward passes and ``|f(x)|·|z|`` numbers.
``mode="directions"`` densifies nothing and differences no single entry: for a
few random directions ``u`` of each input and parameter, it compares the
products ``<v, L u>``, ``<v L, u>`` and the finite difference of
``t ↦ <v, f(z + t·u)>``, two forward passes per direction whatever the size
of ``z``. A wrong derivative moves ``<v L, u>`` for almost every ``u``; the
directions mode misses only an error that the random directions happen to be
orthogonal to, which for a few Gaussian directions has probability zero.

``mode="auto"`` checks entry by entry when every batch Jacobian is small:
``|f(x)|·|z| <= MAX_DENSE`` (2·10^5 entries, 1.6 MB) and ``|z| <= MAX_DIFFERENCED``
(2,000 entries, so at most 4,000 forward passes) for every input and parameter
``z``, with ``|f(x)|`` all the entries of the output(s) over the batch (``B·M``;
for a data input ``|z| = B·N``, so the bound is on ``B·M·B·N``). Otherwise it
checks along directions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "MAX_DENSE",
    "MAX_DIFFERENCED",
    "MODES",
    "along_entry",
    "choose_mode",
    "random_direction",
]

MODES = ("auto", "entries", "directions")
#: "auto" checks entry by entry only if no batch Jacobian has more entries than this...
MAX_DENSE = 200_000
#: ...and no input or parameter has more entries than this.
MAX_DIFFERENCED = 2_000


def choose_mode(where: str, mode: str, directions: int, out_size: int, sizes: Iterable[int]) -> str:
    """``"entries"`` or ``"directions"``: ``mode`` itself, or the choice of ``"auto"``."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"{where}: directions must be a positive int, got {directions!r}")
    if mode != "auto":
        return mode
    small = all(n <= MAX_DIFFERENCED and out_size * n <= MAX_DENSE for n in sizes)
    return "entries" if small else "directions"


def random_direction(
    rng: np.random.Generator, z: np.ndarray, excluded: np.ndarray | None = None
) -> np.ndarray:
    """A random direction scaled entry by entry like the steps, zero where excluded.

    Entry ``j`` is ``r_j·max(1, |z_j|)`` with ``r`` standard normal: moving ``z``
    by ``eps`` times it is a relative step for large entries, as in the
    finite differences of one entry.
    """
    r = rng.standard_normal(np.shape(z))
    d = r * np.maximum(1.0, np.abs(np.asarray(z, np.float64)))
    if excluded is not None:
        d.reshape(-1)[excluded] = 0.0
    return d


def along_entry(_r: int, c: int) -> str:
    """Labels of a comparison along directions: ``along u_1``."""
    return f"along u_{c}"
