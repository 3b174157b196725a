"""Exact per-layer blocks of the generalized Gauss–Newton matrix.

``G = Σ_b J_bᵀ H_b J_b``, where ``H_b`` is the Hessian of the loss in example ``b``'s
prediction (the losses are sums over the examples: ``H`` is block diagonal) and
``J_b`` the Jacobian of that prediction in the parameters. Factor each ``H_b =
Σ_c σ_c s_bc s_bcᵀ`` by its eigenvectors (``s_bc = q_bc √|λ_bc|``, ``σ_c`` the sign,
``+1`` for a convex loss). Then ``J_bᵀ s_bc`` is example ``b``'s gradient for the
seed ``s_bc`` at the prediction, and

    G = Σ_c Σ_b σ_bc (J_bᵀ s_bc)(J_bᵀ s_bc)ᵀ,

one backward pass per column ``c`` (``M`` of them, the entries of one prediction:
the classes), with per-example gradients. No block is approximated (this is not
K-FAC): the blocks equal the diagonal blocks of the dense ``bp.ggn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backprop.curvature.point import Point, give, take
from backprop.curvature.products import check_size, point
from backprop.curvature.walk import Step, hvp_of
from backprop.graph import Graph
from backprop.jacobian.base import DENSE_LIMIT_BYTES
from backprop.layer import Loss, Parameter

__all__ = ["ggn_blocks", "loss_hessian"]


def ggn_blocks(
    model: Any, *inputs: Any, max_bytes: int = DENSE_LIMIT_BYTES, **named: Any
) -> dict[str, np.ndarray]:
    """The exact diagonal blocks of the GGN, one per layer.

    Returns ``{layer: block}``: ``layer`` is the place of the layer's parameters
    (``"0"`` for ``"0.W"`` and ``"0.b"``; a tied Parameter belongs to the layer that
    names it) and ``block`` is ``(n, n)`` over those parameters flattened one after
    the other, in ``model.parameters()`` order. Inputs as for ``bp.ggn``; each block is
    refused above ``max_bytes``.
    """
    if not isinstance(model, Graph):
        raise TypeError(f"ggn_blocks: expected a Sequential or a Graph, got {type(model).__name__}")
    groups: dict[str, list[Parameter]] = {}
    for name, p in model.named_parameters().items():
        groups.setdefault(name.rpartition(".")[0] or name, []).append(p)
    blocks = {}
    for group, params in groups.items():  # refused before the model runs
        n = sum(p.size for p in params)
        check_size(f"ggn_blocks (layer {group!r})", n, max_bytes, "block")
        blocks[group] = np.zeros((n, n))
    pt = point("ggn_blocks", model, inputs, named, "params", ggn=True)
    for step in pt.flat.steps:
        if not (isinstance(step.layer, Loss) and pt.flows[step.outs[0]]):
            continue
        keys = [k for k in step.ins if pt.flows.get(k, False)]
        lam, Q = np.linalg.eigh(loss_hessian(pt, step))  # H_b = Q diag(λ) Qᵀ
        for c in range(lam.shape[1]):
            s = Q[:, :, c] * np.sqrt(np.abs(lam[:, c]))[:, None]
            rows = _per_example(pt, _split(pt, step, keys, s))
            sign = np.sign(lam[:, c])[:, None]
            for group, params in groups.items():
                G = np.concatenate([_rows(rows, p, s.shape[0]) for p in params], axis=1)
                blocks[group] += (G * sign).T @ G
    return blocks


def loss_hessian(pt: Point, step: Step) -> np.ndarray:
    """``H_b``, ``(B, M, M)``: the loss's Hessian in each example's prediction (the
    entries of its float inputs that a direction moves, one input after the other),
    column by column from the loss's ``_hvp``."""
    keys = [k for k in step.ins if pt.flows.get(k, False)]
    xs = [x for k, x in zip(step.ins, step.op.x_in, strict=True) if k in keys]
    B = xs[0].shape[0]
    sizes = [int(x[0].size) for x in xs]
    M = sum(sizes)
    H = np.zeros((B, M, M))
    for j in range(M):
        e = np.zeros((B, M), dtype=xs[0].dtype)
        e[:, j] = 1.0
        dx = _split(pt, step, keys, e)
        second = hvp_of(step.layer)(
            step.op, pt.g_out[step.name], tuple(map(dx.get, step.ins)), {}, True
        )
        if second is None:
            continue
        h_in = [h for k, h in zip(step.ins, second[0], strict=True) if k in keys]
        H[:, :, j] = np.concatenate(
            [
                np.zeros((B, n)) if h is None else h.reshape(B, -1)
                for h, n in zip(h_in, sizes, strict=True)
            ],
            axis=1,
        )
    return H


def _split(pt: Point, step: Step, keys: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """``(B, M)`` rows as one array per input ``key`` of ``step``, in its shape."""
    out, start = {}, 0
    for k, x in zip(step.ins, step.op.x_in, strict=True):
        if k in keys:
            n = int(x[0].size)
            part = np.ascontiguousarray(rows[:, start : start + n], dtype=x.dtype)
            out[k] = part.reshape(x.shape)
            start += n
    return out


def _per_example(pt: Point, seeds: dict[str, np.ndarray]) -> dict[Parameter, np.ndarray]:
    """Each example's parameter gradient for ``seeds`` placed at values of the model:
    ``{Parameter: (B, |θ|)}``, the uses of a tied Parameter added."""
    G: dict[str, Any] = dict(seeds)
    rows: dict[Parameter, np.ndarray] = {}
    for step in reversed(pt.flat.steps):
        g_out = take(G, step)
        if g_out is None:
            continue
        if step.params:
            terms = step.layer.per_example_grads(g_out)
            for name, p in step.params:
                t = terms[name].reshape(terms[name].shape[0], -1)
                rows[p] = rows[p] + t if p in rows else t
        if any(pt.flows.get(k, False) for k in step.ins):
            g_in, _ = step.layer.backward(g_out)
            give(G, step, g_in, pt.flows)
    return rows


def _rows(rows: dict[Parameter, np.ndarray], p: Parameter, B: int) -> np.ndarray:
    return rows[p] if p in rows else np.zeros((B, p.size))
