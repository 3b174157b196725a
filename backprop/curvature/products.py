"""The public products and dense matrices: ``hvp``, ``hessian``, ``ggn_vp``, ``ggn``.

Every function takes a model (a ``Sequential`` or a ``Graph``) whose outputs are
scalar costs (it ends in a loss) and its inputs, as ``gradcheck`` does: positionally
in declaration order (a chain's ``x``, then its targets), by name, or as one
mapping. With no input at all, the operating point of the model's last ``forward``
is used. ``wrt="params"`` (the default) differentiates with respect to every
Parameter, in ``model.parameters()`` order; ``wrt="inputs"`` with respect to every
float input that takes a gradient, in declaration order (the data Hessian of
chapter 14.9's backprop to the data).

A dense matrix is refused, with its size in bytes, above ``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backprop.curvature.point import WRT, Point, direction, feed, space_before
from backprop.curvature.walk import layers
from backprop.jacobian.base import DENSE_LIMIT_BYTES, _bytes
from backprop.layer import Loss

__all__ = ["ggn", "ggn_vp", "hessian", "hvp", "point"]


def point(
    where: str,
    model: Any,
    inputs: tuple[Any, ...],
    named: dict,
    wrt: str,
    v: Any = None,
    *,
    ggn: bool = False,
    max_bytes: int | None = None,
) -> Point:
    """A ``Point`` of ``model`` at ``inputs`` (or at its last forward).

    What can be refused without running the model is refused first, so that a refused
    call leaves the model as it was: ``wrt``, a direction ``v``, a Gauss–Newton matrix
    of a model without a loss (``ggn``), a dense matrix over ``max_bytes``."""
    given = feed(where, model, inputs, named)
    if wrt not in WRT:
        raise ValueError(f"{where}: wrt must be one of {WRT}, got {wrt!r}")
    if ggn and not any(isinstance(layer, Loss) for layer in layers(model)):
        raise ValueError(_NO_LOSS.format(where=where))
    if v is not None or max_bytes is not None:
        if not given:
            model.require_forward(where)
        space = space_before(model, given, wrt)
        if v is not None:
            direction(where, v, space, wrt)
        if max_bytes is not None:
            check_size(where, space.size, max_bytes)
    pt = Point(model, given, wrt, where)
    if ggn:
        require_loss(pt, where)
    return pt


def hvp(
    model: Any, *inputs: Any, v: Mapping[Any, Any], wrt: str = "params", **named: Any
) -> dict[Any, np.ndarray]:
    """``H v``: the Hessian of the scalar cost ``J`` times ``v``.

    ``v`` maps each Parameter (``wrt="params"``) or input name (``wrt="inputs"``) to
    an array of its shape (one left out counts as zeros); the result maps every one of
    them, in the same order as ``model.parameters()`` (or the inputs). Forward over
    reverse: one tangent pass forward, one differentiated backward pass
    (``backprop.curvature``), after the forward and backward passes at the point.
    """
    pt = point("hvp", model, inputs, named, wrt, v)
    return pt.apply(v)


def ggn_vp(
    model: Any, *inputs: Any, v: Mapping[Any, Any], wrt: str = "params", **named: Any
) -> dict[Any, np.ndarray]:
    """``G v = Jᵀ H_loss J v``, the generalized Gauss–Newton matrix times ``v``.

    ``J`` is the Jacobian of the losses' inputs (the network's outputs) and ``H_loss``
    the Hessian of the losses in them; ``G`` is the Hessian with every second-order
    term dropped except the losses' own, positive semidefinite for a convex loss. The
    arguments are those of ``hvp``. A model without a loss layer is refused.
    """
    pt = point("ggn_vp", model, inputs, named, wrt, v, ggn=True)
    return pt.apply(v, ggn=True)


def hessian(
    model: Any,
    *inputs: Any,
    wrt: str = "params",
    max_bytes: int = DENSE_LIMIT_BYTES,
    **named: Any,
) -> np.ndarray:
    """The dense Hessian of ``J``, ``(n, n)``, over the ``n`` entries of every Parameter
    flattened in ``model.parameters()`` order (``wrt="inputs"``: of every float input).

    Column ``j`` is ``H e_j``, one Hessian-vector product each; the matrix is returned as
    computed, not symmetrized (its symmetry is a check of the products). Refused when
    ``n²`` float64 entries would take more than ``max_bytes``.
    """
    pt = point("hessian", model, inputs, named, wrt, max_bytes=max_bytes)
    return _dense(pt, max_bytes, ggn=False)


def ggn(
    model: Any,
    *inputs: Any,
    wrt: str = "params",
    max_bytes: int = DENSE_LIMIT_BYTES,
    **named: Any,
) -> np.ndarray:
    """The dense generalized Gauss–Newton matrix ``Jᵀ H_loss J``, laid out as ``hessian``."""
    pt = point("ggn", model, inputs, named, wrt, ggn=True, max_bytes=max_bytes)
    return _dense(pt, max_bytes, ggn=True)


_NO_LOSS = (
    "{where}: the generalized Gauss-Newton J^T H_loss J splits the model at its loss layers "
    "(bp.Loss), and this model has none that the direction reaches; use bp.hvp for the "
    "Hessian of any scalar cost"
)


def require_loss(pt: Point, where: str) -> None:
    """A ``ValueError`` unless the model has a loss layer where a direction arrives."""
    if not any(isinstance(s.layer, Loss) and pt.flows[s.outs[0]] for s in pt.flat.steps):
        raise ValueError(_NO_LOSS.format(where=where))


def check_size(where: str, n: int, max_bytes: int, what: str = "matrix") -> None:
    """Refuse an ``n × n`` float64 matrix over ``max_bytes``, saying its size."""
    need = n * n * 8
    if need > max_bytes:
        raise ValueError(
            f"{where}: the dense {what} over {n} entries is {n}×{n} float64, "
            f"{_bytes(need)}, over the limit of {_bytes(max_bytes)}; use the products "
            f"(bp.hvp, bp.ggn_vp) or the spectrum (bp.hessian_eigs, bp.hessian_trace), or "
            f"pass a larger max_bytes"
        )


def _dense(pt: Point, max_bytes: int, ggn: bool) -> np.ndarray:
    n = pt.space.size
    check_size(pt.where, n, max_bytes)
    mv = pt.matvec(ggn)
    out = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        out[:, j] = mv(e)
    return out
